#!/usr/bin/env bash
# Install the pinned CometBFT binary into .tools/bin (idempotent).
#
# Never `@latest`: it resolves to the abandoned v1.0 line. The ABCI protocol we
# speak (src/medledger/consensus/abci.py) is the v0.38 one.
set -euo pipefail

COMETBFT_VERSION="${COMETBFT_VERSION:-v0.38.25}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$ROOT/.tools/bin"
BIN="$BIN_DIR/cometbft"
WANT="${COMETBFT_VERSION#v}"

if [[ -x "$BIN" ]]; then
    HAVE="$("$BIN" version 2>/dev/null || true)"
    if [[ "$HAVE" == "$WANT" ]]; then
        echo "cometbft $HAVE already installed at $BIN (skipped)"
        exit 0
    fi
    echo "cometbft at $BIN reports '${HAVE:-nothing}', want $WANT: reinstalling"
fi

if ! command -v go >/dev/null 2>&1; then
    echo "error: 'go' not found on PATH; install Go >= 1.22 to build CometBFT" >&2
    exit 1
fi

mkdir -p "$BIN_DIR"
echo "building cometbft $COMETBFT_VERSION with $(go version) into $BIN_DIR ..."
GOBIN="$BIN_DIR" go install "github.com/cometbft/cometbft/cmd/cometbft@$COMETBFT_VERSION"
HAVE="$("$BIN" version)"
if [[ "$HAVE" != "$WANT" ]]; then
    echo "error: installed cometbft reports '$HAVE', want $WANT" >&2
    exit 1
fi
echo "installed cometbft $HAVE at $BIN"
