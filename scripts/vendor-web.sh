#!/usr/bin/env bash
# Vendors the browser assets the service serves itself (no CDN, works offline) into
# app/web/vendor/, from npm packages pinned by version and by the sha512 of their tarball.
# The files are committed, so installing sdmerge needs no npm; run this only to change a version.
#
#   scripts/vendor-web.sh           fetch every package below (npm pack), check it, copy its files
#   scripts/vendor-web.sh --check   check the committed files against app/web/vendor/SHA256SUMS
#
# To add an asset: one line in PACKAGES, "NAME VERSION SHA512-INTEGRITY DEST FILE...", where the
# integrity is what `npm view NAME@VERSION dist.integrity` prints and each FILE, a path inside the
# package, is copied flat into app/web/vendor/DEST/. Then run the script and commit the result.
set -euo pipefail

die() { echo "vendor-web.sh: $*" >&2; exit 1; }

PACKAGES=(
    # Swagger UI 5 renders OpenAPI 3.1, which FastAPI serves (/docs).
    "swagger-ui-dist 5.35.0 sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ== swagger-ui
        LICENSE NOTICE swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png"
    # ReDoc 2, the standalone bundle (/redoc).
    "redoc 2.5.4 sha512-M6jWhG1qoBnH6TFmzJnstyCZ87HmOY/UzDm78mHiYihEdlV/YcS9ogOo1NlElnJMeLsyxHFe2yFc4sNjHTrABQ== redoc
        LICENSE bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt
        bundles/d87bcbdbea8f8f5aa26f.worker.js.LICENSE.txt"
)

cd "$(dirname "$0")/.."
VENDOR=app/web/vendor

if [ "${1:-}" = "--check" ]; then
    (cd "$VENDOR" && sha256sum --quiet -c SHA256SUMS) || die "vendored files differ from $VENDOR/SHA256SUMS"
    echo "vendor-web.sh: $VENDOR matches SHA256SUMS"
    exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--check]"
command -v npm >/dev/null || die "npm not found (needed only to re-vendor; the committed files need nothing)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

sha512_integrity() {
    python3 -c 'import base64, hashlib, sys; print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$1"
}

for entry in "${PACKAGES[@]}"; do
    read -r name version integrity dest files <<<"$(echo $entry)"
    tarball=$(cd "$WORK" && npm pack --silent "$name@$version" | tail -n 1)
    [ "$(sha512_integrity "$WORK/$tarball")" = "$integrity" ] || die "$name@$version: tarball sha512 differs from the pinned one"
    mkdir -p "$WORK/$name"
    tar -xzf "$WORK/$tarball" -C "$WORK/$name"
    rm -rf "${VENDOR:?}/$dest"
    mkdir -p "$VENDOR/$dest"
    for file in $files; do
        [ -f "$WORK/$name/package/$file" ] || die "$name@$version has no $file"
        cp "$WORK/$name/package/$file" "$VENDOR/$dest/"
    done
    printf '%s@%s\n' "$name" "$version" >"$VENDOR/$dest/VERSION"
    echo "vendor-web.sh: $name@$version -> $VENDOR/$dest/"
done
(cd "$VENDOR" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum >SHA256SUMS)
echo "vendor-web.sh: wrote $VENDOR/SHA256SUMS"
