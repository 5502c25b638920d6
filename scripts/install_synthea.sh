#!/usr/bin/env bash
# Install Synthea (the synthetic EHR generator, org.mitre.synthea:synthea) and its
# runtime dependencies from Maven Central into .tools/synthea/lib (idempotent).
#
# Resolution goes through the machine's Maven (`mvn`) with the small POM in
# scripts/synthea/pom.xml, so the local repository (~/.m2) caches the jars and
# checksums are verified strictly. Run it with `make synthea`; tests and
# `make demo` run it for you. Needs Java >= 11 (Synthea 3.x) and Maven 3.
set -euo pipefail

SYNTHEA_VERSION="${SYNTHEA_VERSION:-3.3.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.tools/synthea"
LIB="$DEST/lib"
STAMP="$DEST/installed"
JAR="$LIB/synthea-$SYNTHEA_VERSION.jar"

installed() {
    [[ -f "$STAMP" && -f "$JAR" ]] && [[ "$(cat "$STAMP")" == "$SYNTHEA_VERSION" ]]
}

if installed; then
    echo "synthea $SYNTHEA_VERSION already installed in $LIB (skipped)"
    exit 0
fi

for tool in java mvn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: '$tool' not found on PATH; Synthea needs Java >= 11 and Maven 3" >&2
        exit 1
    fi
done
JAVA_MAJOR="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
if [[ -z "$JAVA_MAJOR" || "$JAVA_MAJOR" -lt 11 ]]; then
    echo "error: Synthea $SYNTHEA_VERSION needs Java >= 11, found '${JAVA_MAJOR:-unknown}'" >&2
    exit 1
fi

mkdir -p "$DEST"
# .tools may be shared by several checkouts: one installer at a time.
exec 9>"$DEST/.lock"
flock 9
if installed; then
    echo "synthea $SYNTHEA_VERSION installed by another process in $LIB (skipped)"
    exit 0
fi

TMP="$(mktemp -d "$DEST/lib.tmp.XXXXXX")"
trap 'rm -rf "$TMP" "$TMP.log"' EXIT
echo "resolving org.mitre.synthea:synthea:$SYNTHEA_VERSION and its dependencies with $(mvn -v 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g') ..."
if ! mvn -B -q --strict-checksums -Dstyle.color=never \
        -f "$ROOT/scripts/synthea/pom.xml" \
        -Dsynthea.version="$SYNTHEA_VERSION" \
        dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$TMP" >"$TMP.log" 2>&1; then
    sed 's/\x1b\[[0-9;]*m//g' "$TMP.log" >&2
    rm -f "$TMP.log"
    echo "error: Maven could not resolve org.mitre.synthea:synthea:$SYNTHEA_VERSION (see above)" >&2
    exit 1
fi
rm -f "$TMP.log"
if [[ ! -f "$TMP/synthea-$SYNTHEA_VERSION.jar" ]]; then
    echo "error: Maven did not produce synthea-$SYNTHEA_VERSION.jar" >&2
    exit 1
fi
rm -rf "$LIB"
mv "$TMP" "$LIB"
trap - EXIT
echo "$SYNTHEA_VERSION" > "$STAMP"
echo "installed synthea $SYNTHEA_VERSION ($(ls "$LIB" | wc -l) jars) in $LIB"
